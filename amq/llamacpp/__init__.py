"""amq's bit configurations run through llama.cpp (scripts/llama_cpp.py, `amq-export --format gguf`).

`build` fetches and compiles llama.cpp's tools once (cached outside the repository), `gguf_plan`
maps a configuration to GGUF tensor names and the ggml types each tensor's row length allows,
`inputs` loads a run's model and text through amq's composition root, `run` calls the convert
script and the tools and parses their logs, `pipeline` orders the steps and `report` writes the table;
`export` writes one GGUF per model to ship, and `cli_args` holds the options both commands share.
"""
