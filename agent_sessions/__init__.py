"""The public face: Settings, SessionLifecycle, the CLI and the demo."""
