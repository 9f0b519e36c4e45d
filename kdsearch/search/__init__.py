"""The search: the only Ray in kdsearch. Ray Tune runs the trials, Optuna chooses them;
`kdsearch.search.run.run_search` is the entry point. The early-stopping rule
(`early_stopping`) is plain Python; the other modules adapt kdsearch's parts to Ray Tune."""
