"""One trial, without Ray: data, teachers, the logit cache, the distillation losses, the
training loop and `run_trial`."""
