"""The method of the paper: token rewards, reward clipping, token selection, losses and the objectives built
from them; pure tensor math plus the orchestration of one rollout batch (``objectives``)."""
