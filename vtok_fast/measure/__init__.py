"""measurement: budgets, metrics, visualization"""
