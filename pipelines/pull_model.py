"""Pull a registered model and generate text with it (continued test-time training).

python pipelines/pull_model.py models:/tiny@champion --prompt "def parse(" --max-new-tokens 64
"""

from ttte2e.platform.cli.registry import pull_main

if __name__ == "__main__":
    pull_main()
