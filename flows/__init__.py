"""The Prefect flow `fedse` (the Fed-SE round loop) and its deployment `round-loop`: composition only."""
