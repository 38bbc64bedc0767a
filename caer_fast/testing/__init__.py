"""Helpers shared by the tests (tests/), the benchmarks (bench/) and the scripts (tools/): the community
CAER-S model re-stated (:mod:`.community_model`), real media files (:mod:`.media`), checkpoints and a
real server process (:mod:`.serving`), op reference checks (:mod:`.op_checks`), a local Ray head that
stops alone (:mod:`.ray_head`). Not used by the library."""
