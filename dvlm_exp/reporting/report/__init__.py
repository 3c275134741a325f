"""Paper-layout report from results.json files (scripts/report.py), and the name mapping shared with W&B.

    python scripts/report.py outputs/sweeps                    # every complete run under the dir(s)
    python scripts/report.py outputs/sweeps/study_table1 outputs/sweeps/llada_v_baseline --out /tmp/rep

A run is one directory holding `results.json` + `.dvlm_complete` (dvlm_exp.run.record.is_complete); directories
with `failed.json`, or a `.hydra/` but no complete record (still running, killed), are skipped and counted.
Each run becomes one row of `runs.csv`: its keys in the papers' vocabulary (see the mappings below and
docs/report.md) and its main score on the paper's scale. Runs are then matched to the rows of
dvlm_exp/reporting/published.yaml by (model, method, keep_ratio, prune start, layer, benchmark) and laid out
as the paper's tables: rows = model x method x keep ratio (x start, x layer where they vary), columns =
benchmarks, cells = ours / published / delta; plus an efficiency table (our FLOPs reduction, our and the
published time change vs the baseline), PNG plots (accuracy vs FLOPs reduction with the Pareto front,
accuracy vs keep ratio with the published points, accuracy vs layer), report.md and report.html. The last
stdout line of scripts/report.py is a JSON summary.

Nothing heavy is imported at module level: dvlm_exp.run.wandb_log imports the mappings (`main_score`,
`run_keys`) inside every job.

Files: labels (name mappings, one run's keys and score), peers (peer-table join), collect,
published (rows and matching), tables, plots, markdown (report.md; render.py: report.html), build.
The names below are the package's API.
"""

from __future__ import annotations

from dvlm_exp.reporting.report.labels import (  # noqa: F401
    REPO, MODEL_LABELS, METHOD_LABELS, BENCHMARK_LABELS, SCORE_SPECS, FIXED_KEEP, NO_KEEP, AVG_LABEL, PUBLISHED, published_default, main_score, keep_ratio, prune_start, prune_layer, run_keys,
)
from dvlm_exp.reporting.report.peers import (  # noqa: F401
    AR_FAMILIES, PEER_ALIASES, PEER_READINGS, PEER_SCORES, ar_model_label, fastv_readme_label, lavida_cache_label, peer_keys, expand_readings,
)
from dvlm_exp.reporting.report.collect import (  # noqa: F401
    SKIP_DIRS, find_run_dirs, load_run,
)
from dvlm_exp.reporting.report.published import (  # noqa: F401
    load_published, matches,
)
from dvlm_exp.reporting.report.tables import (  # noqa: F401
    assign_tables, build_tables,
)
from dvlm_exp.reporting.report.plots import (  # noqa: F401
    make_plots, score_axis,
)
from dvlm_exp.reporting.report.markdown import (  # noqa: F401
    MAPPING_NOTE, mapping_data, mapping_tables, published_warnings, render,
)
from dvlm_exp.reporting.report.build import (  # noqa: F401
    build_report,
)
