# Kernel lab make targets: filled in by the kernel-lab work (issue 3).
