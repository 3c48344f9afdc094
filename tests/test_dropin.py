

@pytest.mark.parametrize("order, backend", [(1, "autograd"), (2, "lowrank")])
def test_set_grad_changes_no_step_of_kfac(order, backend):
    """set_grad=True forms Qbar_u where K-FAC's direction comes from the statistics' rows
    (B = 2 against 20 x 16 and 16 x 3 layers): the steps are those of set_grad=False."""
    runs = []
    for set_grad in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        x, y = batch(B=2, d_in=20)
        opt = OCNOpt(model, curvature="kfac", order=order, backend=backend, lr=0.1,
                     set_grad=set_grad)
        for _ in range(3):
            opt.step(x, y)
        runs.append(model)
    for p, q in zip(*(m.parameters() for m in runs)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert all(p.grad is not None for p in runs[0].parameters())
    assert all(p.grad is None for p in runs[1].parameters())
