"""The task-aware HTTP gateway (`model-eval serve`): OpenAI-compatible calls routed by each task's
assignment, logged as production calls, with feedback and read-only statistics.

| module | what |
| --- | --- |
| `app.py` | the FastAPI routes, the lean chat route ahead of them, /docs with its own Swagger UI files, the service state, `serve` (uvicorn) |
| `openai_api.py` | the chat-completions wire format: request checks, answers, stream events |
| `security.py` | tokens, the bind rules, body size and rate limits |
| `reads.py` | tasks, leaderboards and model statistics from the published warehouse and the call logs |

Routing, calling and logging are `model_eval.routed_calls`, shared with in-process applications.
"""
