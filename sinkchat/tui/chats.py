"""Ctrl+O: the saved chats, newest first, with a search box; Enter opens one, Ctrl+D deletes one.

The screen only reads the store (``store.list``); opening and deleting go through the app, which
owns the open chat, its lock and its autosave.
"""

from __future__ import annotations

from datetime import datetime

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, Label

from ..store import ChatInfo


class ConfirmDelete(ModalScreen[bool]):
    """Y deletes, N or Esc keeps: a deletion cannot be undone."""

    BINDINGS = [Binding("y", "answer(True)", "Delete"), Binding("n,escape", "answer(False)", "Keep")]
    DEFAULT_CSS = """
    ConfirmDelete { align: center middle; }
    ConfirmDelete > Label { width: 64; border: thick $error; background: $surface; padding: 1 2; }
    """

    def __init__(self, info: ChatInfo):
        super().__init__()
        self.info = info

    def compose(self):
        yield Label(f"Delete chat {self.info.id} “{self.info.title}” for good?\n\ny: delete   n / esc: keep",
                    markup=False)

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ChatsScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("enter", "open", "Open", priority=True),
        Binding("ctrl+d", "delete", "Delete", priority=True),
        Binding("down", "move(1)", "Next", show=False),
        Binding("up", "move(-1)", "Previous", show=False),
    ]
    DEFAULT_CSS = """
    ChatsScreen > Vertical { padding: 1 2; }
    ChatsScreen Input { margin-bottom: 1; }
    ChatsScreen DataTable { height: 1fr; }
    ChatsScreen .empty { color: $text-muted; padding: 0 1; }
    """
    COLUMNS = ("id", "title", "updated", "messages", "tokens")

    def __init__(self, app):
        super().__init__()
        self.chat_app = app
        self.rows: list[ChatInfo] = []

    def compose(self):
        with Vertical():
            yield Label("Saved chats, newest first", classes="title")
            yield Input(placeholder="Search titles and messages", id="search")
            yield DataTable(cursor_type="row", zebra_stripes=True)
            yield Label("", classes="empty")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*self.COLUMNS)
        self.reload()
        self.query_one(Input).focus()

    def reload(self) -> None:
        """Fill the table from ``store.list(query)``; the open chat is marked with a ●."""
        query = self.query_one(Input).value.strip() or None
        with self.chat_app.saver.lock:  # a save in flight holds it (rarely: saves follow replies)
            self.rows = self.chat_app.store.list(query)
        table = self.query_one(DataTable)
        table.clear()
        open_id = self.chat_app.chat_id
        for c in self.rows:
            when = datetime.fromtimestamp(c.updated).strftime("%Y-%m-%d %H:%M")
            mark = "● " if c.id == open_id else ""
            table.add_row(str(c.id), mark + c.title, when, str(c.n_messages), str(c.n_tokens), key=str(c.id))
        empty = "" if self.rows else ("no saved chats" + (f" matching {query!r}" if query else ""))
        self.query_one(".empty", Label).update(empty)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.reload()

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

    async def action_open(self) -> None:
        info = self.selected()
        if info is None:
            self.notify("no chat selected", severity="warning")
            return
        if await self.chat_app.open_chat(info.id):
            self.app.pop_screen()

    def action_delete(self) -> None:
        info = self.selected()
        if info is None:
            self.notify("no chat selected", severity="warning")
            return

        async def answered(yes: bool | None) -> None:
            if yes and await self.chat_app.delete_chat(info.id):
                self.reload()

        self.app.push_screen(ConfirmDelete(info), answered)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()  # Enter is bound to "open" at screen level; a mouse click selects only
