"""Edit checkpoints according to a Plan: slice experts and routers, update configs."""
