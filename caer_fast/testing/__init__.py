"""Helpers shared by the tests (tests/), the benchmarks (bench/) and the scripts (tools/): the community
CAER-S model re-stated (:mod:`.community_model`), real media files (:mod:`.media`), checkpoints and a
real server process (:mod:`.serving`), op reference checks (:mod:`.op_checks`). Not used by the library."""
