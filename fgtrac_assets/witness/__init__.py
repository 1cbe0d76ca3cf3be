"""The witness (C2SP tlog-witness): its state, HTTP server, client and commands, over integrity."""
