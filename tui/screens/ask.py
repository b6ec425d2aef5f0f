"""A one-line question (run-now parameter overrides); dismisses with the text, or None on Escape."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static


class AskScreen(ModalScreen[str | None]):
    """A prompt and an input line."""

    BINDINGS = [Binding("escape", "dismiss(None)", "cancel")]

    def __init__(self, prompt: str, placeholder: str = "") -> None:
        super().__init__()
        self.prompt = prompt
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        """The prompt above the input."""
        with Vertical(id="dialog"):
            yield Static(self.prompt, id="question")
            yield Input(placeholder=self.placeholder, id="answer")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter answers with the text."""
        self.dismiss(event.value)
