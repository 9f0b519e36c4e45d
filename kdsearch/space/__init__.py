"""The search space: the file language, the specs a trial is made of, the dimensions, the
objectives / datasets / samplers tables and exact FLOPs. No torch, no Ray: everything else
reads these."""
