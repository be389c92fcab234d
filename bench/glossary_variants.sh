# Sourced by bench/glossary_measure.sh and bench/gemma_gpu.sh: the prep options of issue 19's four Gemma 3 270M
# adapters, given the array `glossary` (--glossary FILE ...). `variant_prep NAME` prints them.
variant_prep() {
  case $1 in
    chosen) ;;
    analysis) echo "${glossary[@]}" ;;
    hints) echo "${glossary[@]} --set prep.glossary_analysis_share=0 --set prep.glossary_hint_share=0.5" ;;
    both) echo "${glossary[@]} --set prep.glossary_hint_share=0.5" ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}
