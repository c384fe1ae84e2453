"""Reference code: other implementations' steps, written against ``raydistill.steprunner.StepRunner``,
that the benchmark races ours against and the tests compare ours with. Not part of the product."""
