"""The pipeline's report: ``report.md`` and ``report.html`` in the pipeline folder.

It reads what each stage left on disk (manifests, metrics.jsonl, configs, plots), so it
renders for any pipeline, finished or cut short: a missing stage says "not run". Images
are copied or drawn under ``report/`` so the markdown stays readable when the folder
moves; the HTML is the same markdown rendered by Python-Markdown, with every image
embedded and its own CSS, so the one file opens offline. Entry points:
``evaluation.evaluate_final`` and ``write.write_report``.
"""
