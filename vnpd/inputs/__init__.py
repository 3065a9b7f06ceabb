"""Input kinds: what a job's rows are and where their residues come from."""
