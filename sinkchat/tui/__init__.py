"""The Textual interface: ``sinkchat`` without ``--plain``. Entry point: :func:`sinkchat.tui.app.run`."""
