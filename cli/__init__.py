"""`finetune`, the operator's command line: run the service, workers, migrations, admin
commands and the end-to-end demo. It sits above `service`, `worker` and `core` and imports
the heavy parts (uvicorn, torch, the demo's httpx/tqdm/scikit-learn) only in the commands
that need them, so an API-only install runs `finetune serve` without torch."""
