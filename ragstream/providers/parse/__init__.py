"""The parse port and its providers.

port         Parser (the port) and ParseResult; the page markers of parsed Markdown
local        LocalParser: PDF, Markdown, HTML and text, in child processes with limits
llamaparse   LlamaParseParser: LlamaParse's REST API (httpx loads only when it is used)
jobs         JobTracker: many LlamaParse jobs in flight, each followed by a task of its own
"""
