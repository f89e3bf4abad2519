"""Regenerate the configuration reference table in README.md from the config models.

    python docs/config_reference.py

tests/pipeline/test_config.py fails when a config key is missing from README.md.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.config import NucleusConfig, Section  # noqa: E402


def rows(model=NucleusConfig, prefix=""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            yield from rows(ann, f"{prefix}{name}.")
        else:
            default = field.default if isinstance(field.default, str) else json.dumps(field.default)
            yield f"| `{prefix}{name}` | `{default}` | {field.description} |"


readme = ROOT / "README.md"
text = readme.read_text()
start = text.index("| key | default | meaning |")
end = text.index("\n## ", start)
table = "| key | default | meaning |\n|---|---|---|\n" + "\n".join(rows()) + "\n"
readme.write_text(text[:start] + table + text[end:])
print(f"updated {readme}")
