"""Reading model output (shared by the APIs): tool calls, reasoning, the tokenizer's response
template, and the grammars that force a call's shape."""
