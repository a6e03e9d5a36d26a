"""One module per op: argument checks, the torch.library custom op (+ fake + autograd), the public function."""
