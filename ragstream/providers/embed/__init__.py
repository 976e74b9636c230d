"""The embed port and its providers.

port     Embedder (the port) and EmbedResult
local    LocalEmbedder: deterministic feature hashing, no model, no network
openai   OpenAIEmbedder: the openai SDK, requests packed to the API's limits (loads only
         when it is used)
"""
