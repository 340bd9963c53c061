"""The learner: policy networks, estimators, the loss, the Learner and the WeightStore."""
