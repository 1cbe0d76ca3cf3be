"""The rating GNN of the multimodal_graph pipeline: GraphSAGE over user-movie edges made heterogeneous with `to_hetero`.

Follows PyG's MovieLens link-regression example (examples/hetero/hetero_link_pred.py):
a two-layer SAGEConv encoder converted with ``to_hetero`` over ('user', 'rates', 'movie')
and its reverse, then an edge decoder MLP on [z_user, z_movie].  Users enter as a learned
embedding (by node index), movies as a projection of their content features (title text,
genres, year).  The decoder's final layer ``decoder.out`` is a plain ``nn.Linear``: the
layer whose per-sample gradient factors TracInCP uses.

The message-passing graph (movie features and the training edges) is held in
non-persistent buffers: it travels with the model object, not with its checkpoints.

torch and torch_geometric are imported inside the functions: importing this module
must stay cheap (loading the Dagster definitions never imports them).
"""

EDGE = ("user", "rates", "movie")
REV_EDGE = ("movie", "rev_rates", "user")


def build_rating_gnn(num_users: int, movie_x, mp_edges, global_mean: float, hidden: int = 32):
    """Return a RatingGNN whose forward(pairs (n, 2): user index, movie index) predicts n ratings over the given graph.

    ``movie_x`` is a (num_movies, features) float tensor, ``mp_edges`` a (2, E) long tensor of
    message-passing (user index, movie index) edges, ``global_mean`` the output offset.
    """
    import warnings

    import torch
    from torch import nn

    with warnings.catch_warnings():
        # importing torch_geometric runs torch.jit.script in PyG's own modules, which torch 2.13 deprecates: PyG's
        # warning, not ours, and the import is where it fires
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
        from torch_geometric.nn import SAGEConv, to_hetero

    class Encoder(nn.Module):
        """Two GraphSAGE layers (mean aggregation), ReLU between them."""

        def __init__(self, channels: int):
            super().__init__()
            self.conv1 = SAGEConv((channels, channels), channels)
            self.conv2 = SAGEConv((channels, channels), channels)

        def forward(self, x, edge_index):
            return self.conv2(self.conv1(x, edge_index).relu(), edge_index)

    class EdgeDecoder(nn.Module):
        """An MLP on [z_user, z_movie]: `hidden` then the final linear layer `out`."""

        def __init__(self, channels: int):
            super().__init__()
            self.hidden = nn.Linear(2 * channels, channels)
            self.out = nn.Linear(channels, 1)

        def forward(self, z_user, z_movie):
            return self.out(self.hidden(torch.cat([z_user, z_movie], dim=-1)).relu()).view(-1)

    class RatingGNN(nn.Module):
        """Heterogeneous GraphSAGE encoder + edge decoder predicting the rating of (user, movie) pairs."""

        def __init__(self):
            super().__init__()
            self.user_embedding = nn.Embedding(num_users, hidden)
            self.movie_projection = nn.Linear(movie_x.shape[1], hidden)
            metadata = (["user", "movie"], [EDGE, REV_EDGE])
            self.encoder = to_hetero(Encoder(hidden), metadata, aggr="sum")
            self.decoder = EdgeDecoder(hidden)
            self.register_buffer("global_mean", torch.tensor(float(global_mean)))
            self.register_buffer("movie_x", movie_x.float(), persistent=False)
            self.register_buffer("mp_edges", mp_edges.long(), persistent=False)

        def encode(self):
            """Return the final node embeddings {'user': (U, h), 'movie': (M, h)} after two rounds of message passing."""
            x = {"user": self.user_embedding.weight, "movie": self.movie_projection(self.movie_x)}
            edges = {EDGE: self.mp_edges, REV_EDGE: self.mp_edges.flip(0)}
            return self.encoder(x, edges)

        def forward(self, pairs):
            z = self.encode()
            return self.decoder(z["user"][pairs[:, 0]], z["movie"][pairs[:, 1]]) + self.global_mean

    return RatingGNN()
