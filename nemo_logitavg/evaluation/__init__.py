"""Evaluation: sample completions of test prompts through a rollout server, score them, and report accuracy with
bootstrap confidence intervals, format metrics and response length; compare runs with a paired bootstrap.

By what each part does:

- ``serving``: how a model is served for evaluation (``resolve_model``) and evaluated (``evaluate_model``);
- ``scoring``: rewards of completions, a run's summary, the across-seed aggregate and the paired comparison;
- ``stats``: the interval statistics across problems and across training seeds, pure functions (no I/O);
- ``reports``: the ``results.*`` files (and reading them back), the reports and their plots;
- ``reproduction``: the reproduction job's figures across training seeds and its report;
- ``job_report``: the main job's and the reproduction job's report, gathered from the job's run directory.

The averaged-model bundle (policy, reference, ref_weight) is ``nemo_logitavg.models.bundle``. This package
re-exports the public names of its modules (and the tables of ``nemo_logitavg.tables``).
"""

from nemo_logitavg.evaluation.reports import (
    plot_ablation,
    plot_curves,
    report_markdown,
    runs_from_json,
    seed_table,
    write_reports,
)
from nemo_logitavg.evaluation.scoring import (
    FORMAT_KEYS,
    GREEDY,
    SAMPLED,
    Run,
    SamplingMode,
    accuracy_by_type,
    aggregate,
    compare,
    score_records,
    summarize,
)
from nemo_logitavg.evaluation.serving import (
    ServedModel,
    evaluate_model,
    evaluate_served,
    generate,
    is_mcore_checkpoint,
    resolve_model,
)
from nemo_logitavg.evaluation.stats import (
    bootstrap_ci,
    bootstrap_means,
    minimum_detectable_difference,
    paired_bootstrap,
    paired_seed_difference,
    seed_t_interval,
    t_quantile,
)
from nemo_logitavg.tables import csv_text, markdown_table

__all__ = [
    "FORMAT_KEYS",
    "GREEDY",
    "SAMPLED",
    "Run",
    "SamplingMode",
    "ServedModel",
    "accuracy_by_type",
    "aggregate",
    "bootstrap_ci",
    "bootstrap_means",
    "compare",
    "csv_text",
    "evaluate_model",
    "evaluate_served",
    "generate",
    "is_mcore_checkpoint",
    "markdown_table",
    "minimum_detectable_difference",
    "paired_bootstrap",
    "paired_seed_difference",
    "plot_ablation",
    "plot_curves",
    "report_markdown",
    "resolve_model",
    "runs_from_json",
    "score_records",
    "seed_table",
    "seed_t_interval",
    "summarize",
    "t_quantile",
    "write_reports",
]
