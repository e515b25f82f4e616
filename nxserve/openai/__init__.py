"""An OpenAI-compatible HTTP API (completions, chat completions, models, health) in front of
nxserve's public gRPC API: `nxserve openai --target HOST:PORT --port P`, or `nxserve up --openai-port P`.

- `protocol`: OpenAI's request and response JSON, to and from the client's GenerateOptions;
  what is refused and why.
- `chat`: messages to a prompt with the checkpoint's chat template, as transformers renders it.
- `errors`: OpenAI's error JSON, and the HTTP status of each gRPC code.
- `server`: the aiohttp handlers; `__main__`: the command; `launch`: a gateway process for
  `nxserve up`, tests and benchmarks.
"""
