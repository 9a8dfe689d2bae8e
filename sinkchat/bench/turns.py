"""``sinkchat bench turns``: what evicting whole turns does to a chat, where ``bench ppl`` cannot look
(it streams text with no turns).

For each ``--evict`` mode, through the chat engine itself (:class:`~sinkchat.engine.Chat`, greedy):

* **generated**: a scripted chat of :data:`SCRIPT`'s questions; a reply is *degenerate* when it is
  empty or repeats the previous reply word for word (what a chat template cut mid-turn tends to do);
* **teacher-forced**: the same questions with :data:`SCRIPT`'s reference replies fed as the model's
  turns, each reference token scored (and the end of the turn) with the cache as the chat would
  hold it there: the perplexity of a fixed transcript under each mode.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..engine import END_OF_TURN, Chat, Done, Evicted
from ..settings import Settings

# (question, reference reply): a fixed chat about one trip, some questions looking back at earlier turns.
SCRIPT = [
    ("Hi! I am planning a trip to Lisbon in May. Can you help me?",
     "Of course! Lisbon in May is lovely: warm days, few rains and long evenings. What would you like to plan?"),
    ("I will stay five days. What should I see first?",
     "Start with the Alfama district and the castle of Saint George, which has the best view over the city."),
    ("How do I get from the airport to the centre?",
     "Take the red metro line from the airport and change to the green or blue line; it takes about half an hour."),
    ("Is the metro expensive?",
     "No. A single ride costs less than two euros, and a rechargeable card makes every trip cheaper."),
    ("What food should I try?",
     "Try pastel de nata, grilled sardines, bacalhau and a bifana, a small pork sandwich sold in many cafes."),
    ("Where can I find the best pastel de nata?",
     "The bakery in Belem is the most famous one, but many small bakeries in the centre make them just as well."),
    ("How far is Belem from the centre?",
     "About six kilometres to the west. Tram 15 or a train from Cais do Sodre gets you there in twenty minutes."),
    ("What else is in Belem?",
     "The Jeronimos Monastery, the Tower of Belem and the Monument to the Discoveries, all close to the river."),
    ("Should I buy tickets in advance?",
     "For the monastery, yes: the queue can take an hour in May. Early morning is the quietest time to go."),
    ("Is Lisbon a good city for walking?",
     "Yes, but it is built on seven hills and the streets are steep, so bring comfortable shoes."),
    ("What is tram 28?",
     "An old yellow tram that climbs through Graca, Alfama and Baixa. It is charming but often very crowded."),
    ("Can you suggest a day trip?",
     "Sintra is the classic choice: palaces and gardens in green hills, forty minutes away by train."),
    ("Which palace in Sintra is the most beautiful?",
     "The Pena Palace, painted yellow and red, stands on a hilltop with a view all the way to the ocean."),
    ("How long should I stay in Sintra?",
     "A full day. The palaces are far apart and the paths between them climb, so start early."),
    ("Are there beaches near Lisbon?",
     "Yes. Cascais and Estoril are half an hour away by train, and Costa da Caparica is just across the river."),
    ("Is the water warm in May?",
     "Not really. The Atlantic stays cool, around seventeen degrees, so most people only swim for a short time."),
    ("Where should I stay in Lisbon?",
     "Baixa and Chiado are central and flat, while Alfama is more charming but hilly and noisy at night."),
    ("What is fado?",
     "Fado is a sad and beautiful kind of Portuguese song, often about longing. You can hear it in small houses "
     "in Alfama."),
    ("Do I need to book a fado dinner?",
     "It helps on weekends. Most fado houses serve dinner first and the singers start after nine in the evening."),
    ("How much should I tip in restaurants?",
     "Tipping is modest in Portugal. Rounding up the bill or leaving five to ten percent is plenty."),
    ("Do people speak English?",
     "Many people do, especially young people and anyone working with tourists. A simple obrigado is always welcome."),
    ("What does obrigado mean?",
     "It means thank you. A man says obrigado and a woman says obrigada."),
    ("Is Lisbon safe at night?",
     "Generally yes. Watch for pickpockets on tram 28 and in busy squares, as in any large city."),
    ("What is the weather like in the evening?",
     "In May the evenings are mild, around fifteen degrees, but a wind from the river can make a light jacket useful."),
    ("Which viewpoint has the best sunset?",
     "The Miradouro da Senhora do Monte is the highest, and Santa Catarina is popular with young people at sunset."),
    ("Can you remind me how many days I am staying?",
     "You said you will stay five days in Lisbon, in May."),
    ("Then how would you split the five days?",
     "Day one Alfama and the castle, day two Baixa and Chiado, day three Belem, day four Sintra, day five a beach."),
    ("What should I bring back as a souvenir?",
     "Painted tiles, tinned sardines in colourful boxes, cork goods or a bottle of port wine."),
    ("Where is port wine from?",
     "From the Douro valley in the north of Portugal. It is aged and shipped from the city of Porto."),
    ("Thank you! Any last tip?",
     "Take your time, sit in a cafe with a coffee and a pastel de nata, and enjoy the light of the city."),
]


@dataclass
class TurnsRun:
    """One ``--evict`` mode's results."""

    mode: str
    replies: list[str] = field(default_factory=list)
    empty: int = 0
    repeated: int = 0
    evictions: int = 0
    mid_message: int = 0  # evictions after which the window starts inside a message
    nll: float = 0.0
    scored: int = 0
    evicted: int = 0
    seconds: float = 0.0

    @property
    def ppl(self) -> float | None:
        return math.exp(self.nll / self.scored) if self.scored else None

    def row(self) -> dict:
        return {"mode": self.mode, "turns": len(self.replies), "empty": self.empty, "repeated": self.repeated,
                "ppl": self.ppl, "tokens_scored": self.scored, "evicted": self.evicted,
                "evictions": self.evictions, "mid_message": self.mid_message,
                "seconds": round(self.seconds, 1), "replies": self.replies}


class Forced:
    """A sampler that answers with a fixed reply and the end of the turn, adding up each token's
    negative log-likelihood under the logits it is given (teacher forcing through the engine). It says no
    ``candidates()``, so the engine gives its decode steps every logit, as a log-likelihood needs."""

    def __init__(self, reply: list[int], end: int):
        self.ids, self.nll = [*reply, end], 0.0

    def __call__(self, logits: torch.Tensor, recent: list[int]) -> int:
        tok = self.ids.pop(0)
        self.nll -= torch.log_softmax(logits.double(), -1)[tok].item()
        return tok


def settings_for(mode: str, sinks: int, window: int, max_new_tokens: int) -> Settings:
    return Settings(sinks=sinks, window=window, evict=mode, temperature=0, repetition_penalty=1.1,
                    max_new_tokens=max_new_tokens)


def generated(loaded, run: TurnsRun, settings: Settings, turns: int, tick) -> None:
    """The scripted chat, greedy: count the empty and repeated replies."""
    chat = Chat(loaded, settings)
    for question, _ in SCRIPT[:turns]:
        for event in chat.submit(question):
            if isinstance(event, Evicted):
                start = chat.cache.kept()[1][0]
                run.evictions += 1
                run.mid_message += all(m.start != start for m in chat.messages)
            elif isinstance(event, Done):
                reply = event.reply.strip()
                run.empty += not reply
                run.repeated += bool(reply) and bool(run.replies) and reply == run.replies[-1]
                run.replies.append(reply)
        tick(1)
    run.evicted = chat.occupancy().evicted


def forced(loaded, run: TurnsRun, settings: Settings, turns: int, tick) -> None:
    """The fixed transcript, each reference reply teacher-forced and scored token by token."""
    chat = Chat(loaded, settings.replace(max_new_tokens=4096))
    vocab = chat.tokenizer.get_vocab()
    end = next((vocab[t] for t in END_OF_TURN if vocab.get(t) in chat.stop_ids), min(chat.stop_ids))
    for question, reply in SCRIPT[:turns]:
        ids = chat.encode(reply)
        chat.sampler = Forced(ids, end)
        for _ in chat.submit(question):
            pass
        run.nll += chat.sampler.nll
        run.scored += len(ids) + 1
        tick(1)


def run_turns(loaded, modes: list[str], sinks: int, window: int, turns: int, max_new_tokens: int, bars,
              runs: list[TurnsRun]) -> None:
    """Both halves for each mode, appended to ``runs`` as they finish (an interrupted run keeps them)."""
    for mode in modes:
        run = TurnsRun(mode)
        settings = settings_for(mode, sinks, window, max_new_tokens)
        t0 = time.perf_counter()
        generated(loaded, run, settings, turns, bars(f"{mode}: scripted chat", turns))
        forced(loaded, run, settings, turns, bars(f"{mode}: fixed transcript", turns))
        run.seconds = time.perf_counter() - t0
        runs.append(run)


def turns_report(runs: list[TurnsRun], extra: dict) -> dict:
    return {**extra, "results": [r.row() for r in runs]}
