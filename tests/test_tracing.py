"""The tracer records exactly the batches a DataLoader yields, at the lr the optimizer applies."""

import torch
from torch.utils.data import DataLoader, TensorDataset

from fgtrac_assets.tracing.tracer import Tracer


def test_batched_events_match_loader_batches():
    x = torch.arange(50, dtype=torch.float32).unsqueeze(1)
    y = torch.zeros(50)
    ids = [f"s{i}" for i in range(50)]
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    tracer = Tracer(ids, "run-x")
    traced, traced_opt = tracer.wrap_loader(loader), tracer.wrap_optimizer(opt)
    seen = []
    for _ in range(2):
        for xb, _yb in traced:
            seen.append([f"s{int(v)}" for v in xb[:, 0]])
            opt.zero_grad()
            model(xb).sum().backward()
            traced_opt.step()
        sched.step()
    ev = tracer.events().to_pydict()
    assert len(ev["sample_id"]) == len(tracer) == 100
    flat = [s for batch in seen for s in batch]
    assert ev["sample_id"] == flat  # the same samples, in the same order, as the model saw
    steps = ev["step"]
    assert steps[0] == 0 and steps[-1] == len(seen) - 1
    assert set(ev["lr"][:50]) == {0.5} and set(ev["lr"][50:]) == {0.25}
    assert ev["epoch"][:50] == [0] * 50 and ev["epoch"][50:] == [1] * 50
    assert ev["position"][:8] == list(range(8))


def test_a_step_with_no_new_batch_records_no_samples():
    tracer = Tracer(["a"], "r")
    opt = tracer.wrap_optimizer(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1))
    opt.step()
    assert tracer.step == 1 and len(tracer) == 0
