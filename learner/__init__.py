"""The learner: policy networks, estimators, the Learner and the WeightStore."""
