"""Regenerate the configuration reference table in README.md from the config models.

    python docs/config_reference.py

tests/pipeline/test_config.py fails when a config key is missing from README.md.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.config import config_fields  # noqa: E402


def rows():
    for key, field in config_fields():
        default = field.default if isinstance(field.default, str) else json.dumps(field.default)
        yield f"| `{key}` | `{default}` | {field.description} |"


readme = ROOT / "README.md"
text = readme.read_text()
start = text.index("| key | default | meaning |")
end = text.index("\n## ", start)
table = "| key | default | meaning |\n|---|---|---|\n" + "\n".join(rows()) + "\n"
readme.write_text(text[:start] + table + text[end:])
print(f"updated {readme}")
