"""The HTTP server around the app: connection limits, timeouts, signals, drain, log redaction."""
