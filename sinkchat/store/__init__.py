"""Chats on disk: a SQLite index + transcript + token ledger, and the KV state in safetensors.

Layout of the data dir (``--data-dir``, ``SINKCHAT_DATA_DIR`` or the XDG data dir; made 0700,
every file 0600)::

    chats.db                  chats (index), messages (transcript), tokens (the ledger)   db.py
    state/<id>.safetensors    base: the held K/V at one save, plus a copy of the ledger     statefile.py
    state/<id>.<g>.safetensors  segment: what save g changed (new tokens' K/V, ledger, messages)
    locks/<id>.lock           held (flock) by the one process that has the chat open       locks.py
    state/<id>.draft          the message in flight until its turn is saved (new-<key>.draft for a
                              new chat, locks/new-<key>.lock held while its process lives)

Why two copies: the ledger is the truth and the KV is derived from it. The state files also carry
the transcript and ledger of their saves, so either copy can repair the other. A save writes only
what changed: a segment, and the database rows of the new tokens and messages. Both carry a sha256
checksum and a save generation; on open the newest intact copy wins:

* state file intact and of the same model/geometry -> KV restored as saved (no recomputation);
* state file missing, damaged or foreign (other model files, quant, dtype, sinks or window) -> the
  engine rebuilds the KV by re-prefilling the ledger's sink and window tokens, with a notice;
* database rows damaged -> transcript and ledger restored from the state file, with a notice;
* both damaged, or another tokenizer -> a one-line refusal; nothing is changed on disk.

Every number in a copy is checked before use (:func:`~sinkchat.ledger.state_problem`), and every
error the disk or SQLite reports becomes one line (:class:`SinkchatError`, :class:`SaveError`).

API (the CLI and the TUI use only this)::

    store = Store(data_dir=None)                  # opens/creates and migrates chats.db; Refused if not sinkchat's
    store = Store(data_dir, create=False)         # for reading: NoChats where there is no chats.db (nothing made)
    chat_id = store.create(chat, settings)        # first save; takes the chat's lock
    store.save(chat_id, chat)                     # after every turn and on quit; SaveError on failure
    store.list(query=None) -> [ChatInfo]          # newest first; query searches titles and messages
    notices = store.open(chat_id, chat, read_only=False)   # a fresh Chat continues; ChatLocked if held
                                                  # (on a read-only disk: opened read-only, with a notice)
    store.settings(chat_id) -> dict               # the settings the chat was saved with
    store.transcript(chat_id) -> Transcript       # for show/export, no model needed
    store.rename(chat_id, title); store.delete(chat_id); store.close()
    Autosave(store, chat, settings, chat_id)      # call after each turn
    store.keep_draft(chat_id, Unanswered(typed)); store.take_draft(chat_id)   # the message in flight
"""

from .chats import Autosave, Store
from .records import ChatInfo, ChatLocked, NoChats, ReadOnly, Refused, SaveError, Snapshot, Transcript, Unanswered

__all__ = ["Autosave", "ChatInfo", "ChatLocked", "NoChats", "ReadOnly", "Refused", "SaveError", "Snapshot", "Store",
           "Transcript", "Unanswered"]
