#!/usr/bin/env bash
# The CPU probe (trainer/plan.py cpu_probe_seconds) on one thread and on two, each in a new process, while another
# process multiplies 1024x1024 matrices on torch's two threads (the 2-core development machine, torch 2.13.0+cpu).
${PYTHON:-.venv/bin/python} -c "
import torch,time; a=torch.randn(1024,1024); t=time.time()  # until killed below (at most 10 min)
while time.time()-t<600: a@a" &
HOG=$!
sleep 3
for i in 1 2 3 4 5; do
  ${PYTHON:-.venv/bin/python} -c "from trainer.plan import cpu_probe_seconds as c; print('one thread', round(c(), 4))"
  ${PYTHON:-.venv/bin/python} -c "
import torch, trainer.plan as p
torch.set_num_threads(2)
real = torch.set_num_threads
torch.set_num_threads = lambda n: None  # the probe as it was before: on torch's two threads
print('two threads', round(p.cpu_probe_seconds(), 4))"
done
kill $HOG
