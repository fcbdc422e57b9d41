//! placeholder: the bpf() commands arrive with the kernel data plane.
