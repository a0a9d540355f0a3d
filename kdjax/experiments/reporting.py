"""What every experiment leaves in its workdir: its results as JSON (with the config) and its table."""

from __future__ import annotations

import json
import os


def write_results(workdir: str, results: dict, config, table: str, *, stem: str = "results") -> None:
  """Writes `workdir/<stem>.json` (results and the config) and `workdir/<stem>.md` (the table)."""
  with open(os.path.join(workdir, f"{stem}.json"), "w") as f:
    json.dump({"results": results, "config": config.to_dict()}, f, indent=1, default=str)
  with open(os.path.join(workdir, f"{stem}.md"), "w") as f:
    f.write(table + "\n")
