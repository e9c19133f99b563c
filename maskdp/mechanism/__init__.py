"""The privacy-critical mechanism, small enough to audit in one sitting (DESIGN.md section 3).

- :mod:`~maskdp.mechanism.masks`: the privacy unit (which pixels or tokens are sensitive);
- :mod:`~maskdp.mechanism.views`: the public view ``v(x, m)`` that erases them;
- :mod:`~maskdp.mechanism.batch`: a private batch and its public view, checked;
- :mod:`~maskdp.mechanism.gradient`: ``Delta_i = g_i - h_i`` clipped (via an engine), and the
  public gradient of an independent public batch;
- :mod:`~maskdp.mechanism.noise`: the Gaussian noise; :mod:`~maskdp.mechanism.randomness`: its
  secret source; :mod:`~maskdp.mechanism.sampling`: the exact Poisson sampler;
- :mod:`~maskdp.mechanism.postprocess`: what may be done to the release for free;
- :mod:`~maskdp.mechanism.adjacency`: the neighbouring relation the guarantee is about.
"""
