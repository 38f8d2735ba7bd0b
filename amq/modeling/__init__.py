"""Loading models and discovering their quantizable linear layers."""
