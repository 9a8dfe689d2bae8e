"""Ctrl+O: the saved chats, newest first, with a search box; Enter opens one, Ctrl+D deletes one.

The screen lists chats through the ``lister`` it is given (the app runs it on its store thread)
and posts :class:`ChatsScreen.Open` and :class:`ChatsScreen.Delete`; the app, which owns the open
chat, its lock and its saving, acts on them (and pops this screen or calls :meth:`reload`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from rich.text import Text
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Input, Label

from ..store import ChatInfo
from ..text import clean
from .footer import Footer
from .notices import Say


class ConfirmDelete(ModalScreen[bool]):
    """Y deletes, N or Esc keeps: a deletion cannot be undone."""

    BINDINGS = [Binding("y", "answer(True)", "Delete"), Binding("n,escape", "answer(False)", "Keep")]

    def __init__(self, info: ChatInfo):
        super().__init__()
        self.info = info

    def compose(self):
        title = clean(self.info.title, one_line=True)
        yield Label(f"Delete chat {self.info.id} “{title}” for good?\n\ny: delete   n / esc: keep",
                    markup=False)

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ChatsScreen(Say, Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("enter", "open", "Open", priority=True),
        Binding("ctrl+d", "delete", "Delete", priority=True),
        Binding("down", "move(1)", "Next", show=False),
        Binding("up", "move(-1)", "Previous", show=False),
    ]
    COLUMNS = ("id", "title", "updated", "messages", "tokens")

    @dataclass
    class Open(Message):
        chat_id: int

    @dataclass
    class Delete(Message):
        chat_id: int

    def __init__(self, lister: Callable[[str | None], Awaitable[list[ChatInfo]]], open_id: int | None):
        super().__init__()
        self.lister, self.open_id = lister, open_id
        self.rows: list[ChatInfo] = []

    def compose(self):
        with Vertical():
            yield Label("Saved chats, newest first", classes="title")
            yield Input(placeholder="Search titles and messages", id="search")
            yield DataTable(cursor_type="row", zebra_stripes=True)
            yield Label("", classes="empty", markup=False)
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*self.COLUMNS)
        self.query_one(Input).focus()
        await self.reload()

    async def reload(self) -> None:
        """Fill the table from the lister; the open chat is marked with a ●."""
        query = self.query_one(Input).value.strip() or None
        self.rows = await self.lister(query)
        table = self.query_one(DataTable)
        table.clear()
        open_id = self.open_id
        for c in self.rows:
            when = datetime.fromtimestamp(c.updated).strftime("%Y-%m-%d %H:%M")
            mark = "● " if c.id == open_id else ""
            cells = (str(c.id), mark + c.title, when, str(c.n_messages), str(c.n_tokens))
            table.add_row(*(Text(clean(cell, one_line=True)) for cell in cells), key=str(c.id))  # never markup
        matching = f" matching “{clean(query, one_line=True)}”" if query else ""
        empty = "" if self.rows else "no saved chats" + matching
        self.query_one(".empty", Label).update(empty)

    async def on_input_changed(self, event: Input.Changed) -> None:
        await self.reload()

    def selected(self) -> ChatInfo | None:
        table = self.query_one(DataTable)
        if not self.rows or table.cursor_row is None or not 0 <= table.cursor_row < len(self.rows):
            return None
        return self.rows[table.cursor_row]

    def action_move(self, step: int) -> None:
        """Arrows move the selection even while the search box has the focus."""
        table = self.query_one(DataTable)
        if self.rows:
            table.move_cursor(row=max(0, min(len(self.rows) - 1, table.cursor_row + step)))

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_open(self) -> None:
        info = self.selected()
        if info is None:
            self.say("no chat selected", severity="warning")
            return
        self.post_message(self.Open(info.id))

    def action_delete(self) -> None:
        info = self.selected()
        if info is None:
            self.say("no chat selected", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                if info.id == self.open_id:
                    self.open_id = None
                self.post_message(self.Delete(info.id))

        self.app.push_screen(ConfirmDelete(info), answered)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()  # Enter is bound to "open" at screen level; a mouse click selects only
