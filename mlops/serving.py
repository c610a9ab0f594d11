"""The old name of the model server's command: `python -m mlops.serving` is now `python -m mlops.serve`."""

import sys

if __name__ == "__main__":
    sys.exit("error: `python -m mlops.serving` was renamed: use `python -m mlops.serve` (same --tracking-uri,"
             " --model, --alias/--version; limits and batching now come from conf/serve/default.yaml or --settings)")
