"""The bottom layer: errors, the bar and field model, time conversion, the retry policy and the
typed-setting helpers. It imports nothing of ours (checked by the import contract in
``pyproject.toml``), so every other package may use it."""
