"""Serving: the federation's merged model behind an OpenAI-compatible chat API (`fedchat serve`,
`fedchat chat`). Not the coordinator, and nothing a node runs: the app bundle never ships it."""
