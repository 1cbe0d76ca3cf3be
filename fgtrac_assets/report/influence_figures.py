"""The influence asset's figures: test samples beside their strongest proponents and opponents (picture and table)."""

from . import plots, tables

SHOWN = 4  # test samples shown, and proponents/opponents shown per test sample


def influence_figures(pipeline, prepared_table, train_ids: list, test_ids: list, top) -> dict:
    """Return the metadata entries (markdown) showing the first test samples with their top proponents and opponents."""
    shown = list(range(min(SHOWN, len(test_ids))))

    def scored(idx, score, j):
        return [(train_ids[int(i)], float(v)) for i, v in zip(idx[j, :SHOWN], score[j, :SHOWN])]

    rows = [(test_ids[j], scored(top.proponent_idx, top.proponent_score, j),
             scored(top.opponent_idx, top.opponent_score, j)) for j in shown]
    wanted = sorted({t for t, _, _ in rows} | {s for _, pro, opp in rows for s, _ in pro + opp})
    pics = pipeline.pictures(prepared_table, wanted)

    def captioned(pairs):
        return [(pics[s][0], f"{pics[s][1]} {v:+.3g}") for s, v in pairs]

    grid = [{"test": pics[t][0], "test_label": pics[t][1], "proponents": captioned(pro), "opponents": captioned(opp)}
            for t, pro, opp in rows]
    return {"proponents_opponents_md": plots.markdown_image(plots.proponents_opponents(grid),
                                                            "test samples with their top proponents and opponents"),
            # who, what and how rated, per pipeline
            "proponents_opponents_table_md": tables.proponents_opponents_md(pipeline.describe_samples(prepared_table,
                                                                                                      wanted), rows)}
