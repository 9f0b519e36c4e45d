"""A run's results, without Ray: the tables, trial outcomes, the Pareto front, status, the
pictures, the report and the export."""
