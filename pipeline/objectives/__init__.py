"""What a student minimises: the losses (formula, citation, fp32) and the objective that mixes them."""
