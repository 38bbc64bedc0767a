"""Instruction counts of the public ops' eager calls, for comparing two checkouts on a shared machine
(wall clock and CPU time both move with the load; callgrind's counts do not).

Each case is called N times from a different itertools C function, so one callgrind run counts every case
apart; warm-up calls run outside them. Run it from the checkout to count (its .venv imports that caer_fast):

    W="--toggle-collect=starmap_next --toggle-collect=filterfalse_next --toggle-collect=takewhile_next
       --toggle-collect=dropwhile_next --toggle-collect=accumulate_next --toggle-collect=groupby_next
       --toggle-collect=functools_reduce"
    valgrind --tool=callgrind --collect-atstart=no $W --callgrind-out-file=cg.out \
        .venv/bin/python tools/op_instructions.py
    callgrind_annotate --inclusive=yes cg.out | grep -E "_next |functools_reduce "

Each wrapper's inclusive count divided by its N (printed) is one call's instructions. Optional argument:
a comma-separated subset of CASES, in order (the wrappers are assigned in that order).
"""
import functools
import itertools
import sys

import torch

import caer_fast.ops as ops


def make(case):
    """A no-argument function making one call of ``case`` (fixed inputs, seeded)."""
    g = torch.Generator().manual_seed(0)
    name, _, mode = case.partition(":")
    if name.startswith("pool"):
        shape = {"pool7": (32, 256, 7, 7), "pool2x7": (32, 256, 2, 7, 7), "pool1": (1, 1, 1, 1)}[name]
        args = (torch.randn(shape, generator=g), torch.randn(shape[0], 1, *shape[2:], generator=g))
        fn = ops.attention_pool
    elif name == "fusion":
        args = (torch.randn(32, 256, generator=g), torch.randn(32, 256, generator=g), torch.randn(32, 1, generator=g),
                torch.randn(32, 1, generator=g))
        fn = ops.adaptive_fusion
    elif name == "face":
        args = (torch.randint(0, 256, (32, 400, 712, 3), dtype=torch.uint8, generator=g),
                torch.tensor([[200, 80, 330, 230]] * 32))
        fn = lambda fr, b: ops.face_context(fr, b, (96, 96), (128, 171), (8, 29, 112, 112))
    if mode == "bwd":
        for a in args:
            a.requires_grad_()
        gr = torch.randn(fn(*args).shape, generator=g)
        return lambda: torch.autograd.grad(fn(*args), args, gr)
    def call():
        with torch.no_grad():
            return fn(*args)
    return call


# wrapper C function -> how it calls `call` n times
def w_starmap(call, n): list(itertools.starmap(call, itertools.repeat((), n)))
def w_filterfalse(call, n): list(itertools.filterfalse(lambda i: (call(), True)[1], range(n)))
def w_takewhile(call, n): list(itertools.takewhile(lambda i: (call(), True)[1], range(n)))
def w_dropwhile(call, n): list(itertools.dropwhile(lambda i: (call(), True)[1], range(n)))
def w_accumulate(call, n): list(itertools.accumulate(range(n + 1), lambda a, b: (call(), 0)[1]))
def w_groupby(call, n): list(itertools.groupby(range(n), lambda i: (call(), 0)[1]))
def w_reduce(call, n): functools.reduce(lambda a, b: (call(), 0)[1], range(n + 1))


WRAPPERS = {"starmap_next": w_starmap, "filterfalse_next": w_filterfalse, "takewhile_next": w_takewhile,
            "dropwhile_next": w_dropwhile, "accumulate_next": w_accumulate, "groupby_next": w_groupby,
            "functools_reduce": w_reduce}
# case -> calls counted
CASES = {"fusion": 200, "fusion:bwd": 50, "pool7": 50, "pool7:bwd": 20, "pool2x7": 20, "pool1": 200, "face": 3}


if __name__ == "__main__":
    torch.set_num_threads(1)
    cases = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CASES)
    for case, (wname, w) in zip(cases, WRAPPERS.items()):
        call = make(case)
        for _ in range(5):
            call()  # warm-up
        w(call, CASES[case])
        print(f"{case} -> {wname} x{CASES[case]}", flush=True)
