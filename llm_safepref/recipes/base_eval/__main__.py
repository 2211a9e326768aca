"""``python -m llm_safepref.recipes.base_eval ship|list`` (see the package docstring)."""

import sys

from llm_safepref.recipes.base_eval import main

sys.exit(main())
