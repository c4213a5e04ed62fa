"""`kind: cast`: a dtype change of a full-precision model."""
