"""The point-of-care viewer door: an EPR opens it (IHE Invoke Image Display, or a single-use launch link) on one
patient; the page shows that patient's photos through the core read workflow and policy, every view audited."""
